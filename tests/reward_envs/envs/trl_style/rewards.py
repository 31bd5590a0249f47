"""Written the way TRL's GRPOTrainer wants reward functions."""


def length_reward(prompts, completions, target, **kwargs):
    if any(c == "hang" for c in completions):
        import time

        time.sleep(3600)
    return [abs(len(c) - t) for c, t in zip(completions, target, strict=True)]
