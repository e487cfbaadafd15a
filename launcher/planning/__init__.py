"""The memory plan: hardware detection, per-rank memory estimate, the layout that fits, and its report."""
