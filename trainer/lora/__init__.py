"""The LoRA itself: which layers get one (`targets`) and the trainable weights that join the
frozen model on its activations (`weights`)."""
