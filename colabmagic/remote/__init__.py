"""Code that runs on the GPU host: the agent, the bridge and the kernel-side helpers.

Everything here needs only the standard library, pyzmq and jupyter_client (which ipykernel
brings), and runs on Python >= 3.9, so that it can be sent over SSH to a host where colabmagic is
not installed.
"""
