"""cocotb regression of the generated Verilog against golden/."""
