"""The learning stack: the frozen open_clip foundation, peft LoRA adapters with zero-shot heads,
data, local training, zero-shot augmentation and DP-SGD. Knows no sockets and no protocol."""
