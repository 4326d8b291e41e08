"""What a run leaves behind: run folders and checkpoints (`checkpoints`), LoRA files
(`export`), progress figures, plots and sample grids (`progress`), and a plain sampler for the
standalone library (`sample`)."""
