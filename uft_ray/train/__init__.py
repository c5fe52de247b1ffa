"""Training: the deterministic data plan (`plan`, pure), the DeepSpeed engine (`engine`, the only DeepSpeed
import) and the per-worker loop Ray Train runs (`loop`). Nothing is imported here, so `uft_ray.train.plan`
stays importable without torch, Ray or DeepSpeed.
"""
