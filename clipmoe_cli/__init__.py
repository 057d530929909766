"""The program layer: the ``clipmoe`` console command, the commands that compose the library (`clipmoe_vlm`)
with the recipes (`upcycle`), and the benchmark suite. Nothing here is imported by either of them."""
