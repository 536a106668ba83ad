"""The self-test: faults and honest variants run through compare, the shape sweep, and the minimum detectable effect (docs/faults.md)."""
