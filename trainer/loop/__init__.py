"""Training: the flow-matching maths (`flow`), the resumable loop (`trainer`), the job that runs
it on a worker thread (`job`), and how each block runs for backward (`blocks`, `memory`)."""
