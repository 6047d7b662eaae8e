"""The SOP quantizer: weights in, golden layer streams out."""
