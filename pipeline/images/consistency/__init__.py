"""Characters who stay themselves: the same person in every scene, with the model alone.

For every character some scene names, a reference portrait is rendered once per story and its
trajectory recorded (`record.record_portrait`), or a bundle's picture of them is noised step by
step (`record.reference_from_picture`). A scene naming characters is then made with their
references in view (`replay.references_in_view`): before each of its steps, each reference is
run through the UNet at that step, and the self-attention of the UNet's up blocks lets the
scene attend to the reference's tokens as well as its own (`attention.SharedAttention`). With
IP-Adapter weights configured, the reference picture also steers the scene through the adapter
(`ip_adapter`). What to make and what the manifest says of it: `plan` (no torch there).

Order at load (each later step would be undone by an earlier one done after it):
  1. the pipeline, placed on its device, fused QKV if configured;
  2. `ip_adapter.load_ip_adapter(...)` when `[characters] ip_adapter` is set, then
     `pipe.to(device)` again (diffusers loads the adapter's layers on the CPU);
  3. `attention.SharedAttention(pipe.unet)`, last; `installed()` says whether something
     (attention slicing, `set_attn_processor`) has replaced its processors since.

A reference (`reference.Reference`) is plain data, numpy arrays and values: it pickles into a
Ray task or an .npz file (`save_reference`/`load_reference`), and any worker with the same
model makes the same scene from it.
"""
