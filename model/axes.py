"""Logical axis names carried by parameters and hot activations.

The model only ever speaks these names; the config's `sharding.rules` maps them to mesh
axes (data, fsdp, tensor). One model file therefore serves 1 CPU, 8 fake devices and a pod.
"""

BATCH = "batch"  # examples in a batch
LENGTH = "length"  # sequence positions
EMBED = "embed"  # model width d_model
HEADS = "heads"  # query heads
KV_HEADS = "kv_heads"  # key/value heads (grouped-query attention)
HEAD_DIM = "head_dim"  # per-head width
MLP = "mlp"  # feed-forward hidden width
VOCAB = "vocab"  # vocabulary rows of the embedding / LM head
LAYERS = "layers"  # stacked layer axis under nn.scan
