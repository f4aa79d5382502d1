"""The equalization core the float-exact passes share (smooth_quant, awq, equalize_outputs, cle):
per-channel factor arithmetic (channels.py), folding factors into Conv weights
(conv_channels.py), groups of linears reading one activation and where its division goes
(groups.py), per-channel activation statistics (stats.py), and DFQ's bias correction
(bias_correction.py, run by quantize). No pass is registered here."""
