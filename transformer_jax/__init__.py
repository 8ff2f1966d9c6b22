"""transformer_jax: the Transformer of "Attention Is All You Need" in JAX/Flax NNX."""

from transformer_jax import topology as _topology

# Before jax starts its backends: an installed libtpu (test extras) must not hold
# the machine-wide TPU lock or query a metadata server where there are no TPUs.
_topology.quiet_libtpu_off_tpu()
