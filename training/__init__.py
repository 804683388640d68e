"""Training, evaluation and benchmarking scripts for mvpseg (prompt learning, MVP-SEG+)."""
