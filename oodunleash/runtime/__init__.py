"""The ground floor every stage stands on: what the library reads of a user's model (its device,
a compiled wrapper), of its batches (images, labels, logits, with the checks on them), of the
processes it runs in (DDP sharding, all-reduce, gather) and how it writes files (atomically).

Nothing here knows about masks, fine-tunes or scores.
"""

from oodunleash.runtime.batches import iter_batches, named_ood_loaders, split_batch
from oodunleash.runtime.distributed import init_distributed, is_distributed, is_main_process
from oodunleash.runtime.files import write_atomic
from oodunleash.runtime.modules import model_device, unwrap_compiled

__all__ = [
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "iter_batches",
    "model_device",
    "named_ood_loaders",
    "split_batch",
    "unwrap_compiled",
    "write_atomic",
]
