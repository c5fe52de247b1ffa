"""`method: hint_rft`: hint-guided SFT + RFT (Liu, Farina, Ozdaglar, arXiv 2505.16984; docs/design.md "Hint-guided RFT").

    prompts.py   the task rows (generated or read, bad rows quarantined), the step plan, each rank's feed
    rollout.py   the rollout actor pool: n seeded continuations of prompt + hint (transformers or vLLM + LoRA)
    loop.py      the Ray Train worker loop: rollouts -> rewards -> GRPO + hint NLL on the shared engine
    driver.py    run(cfg): prompts, actors, TorchTrainer, the run directory
    method.py    the method as uft_ray.methods registers it: config checks, resources, progress line, demo

Tasks and verifiers live in `uft_ray.tasks`, the loss terms in `uft_ray.losses`, the engine in
`uft_ray.train.engine`: the offline method's parts, shared.
"""
