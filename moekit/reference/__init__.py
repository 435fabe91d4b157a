"""Plain per-token loop implementations: the yardstick for the fast paths, offered for verification."""

from moekit.reference.layer import kept_pairs, reference_forward

__all__ = ["kept_pairs", "reference_forward"]
