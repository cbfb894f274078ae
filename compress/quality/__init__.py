"""Stage 3, scoring: accuracy, fidelity to the original, parity of a lowered model, the accuracy guard, and the
evaluation cache."""
