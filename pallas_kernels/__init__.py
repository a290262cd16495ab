"""Pallas kernels for specpv-jax, each beside its pure-jnp reference."""

from pallas_kernels.tree_attention import merge_attention, tree_attention, tree_attention_reference

__all__ = ["merge_attention", "tree_attention", "tree_attention_reference"]
