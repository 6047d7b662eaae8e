"""Open-source synthesis and FPGA board tops."""
