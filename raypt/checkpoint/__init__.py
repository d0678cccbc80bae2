"""World-size-independent checkpoints: full fp32 tensors by name, spread over the ranks, in safetensors, with one
versioned index (see `index`). Any world size, ZeRO stage or engine loads them; nothing is unpickled."""
from raypt.checkpoint.index import FORMAT, STATE, CheckpointError, Reader, TrainState, load_weights, read_state
from raypt.checkpoint.restore import newest_verified
from raypt.checkpoint.store import Uploader, latest_good, list_checkpoints, local_copy, prune
from raypt.checkpoint.write import save_checkpoint

__all__ = ["FORMAT", "STATE", "CheckpointError", "Reader", "TrainState", "Uploader", "latest_good",
           "list_checkpoints", "load_weights", "local_copy", "newest_verified", "prune", "read_state",
           "save_checkpoint"]
