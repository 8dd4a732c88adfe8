"""Making images: the seam the rest of storyreel sees, and the engines behind it.

seam.py      the request, result, ticket and pool types (plain data; no torch)
factory.py   `open_workers`: the one place the engine is picked
local.py     one warm generator in this process
ray_pool.py  one warm Ray actor per worker (imported only with engine = "ray"),
             with ray_dispatch.py (the thread that hands scenes out) and ray_start.py
sdxl.py      the SDXL generator itself, with sdxl_load.py (load-time choices),
             memory.py (the OOM ladder), conditioning.py (prompts) and decode.py (the VAE)
model.py     finding and loading the weights (offline); tiny.py the random-weight model;
             device.py every question asked of the accelerator
consistency/ characters kept the same person: reference trajectories, shared attention, IP-Adapter
"""
