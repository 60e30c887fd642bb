"""`estimate --task`: what preference and RL runs add to a supervised run's memory."""

from lorakit.tools.estimate import estimate, load_config, rollout_cache_bytes


def memory(**kw):
    result = estimate(load_config("llama-7b"), r=8, batch_size=2, seq_len=256, **kw)
    return {row.method: row for row in result.memory}


def test_dpo_counts_two_sequences_per_pair_and_grpo_its_completions_and_cache():
    sft, dpo, grpo = memory(), memory(task="dpo"), memory(task="grpo", num_generations=4)
    assert dpo["lora"].activations == estimate(load_config("llama-7b"), r=8, batch_size=4, seq_len=256).memory[1].activations
    assert dpo["lora"].weights == sft["lora"].weights  # the reference is the adapter switched off: no second model
    cache = rollout_cache_bytes(load_config("llama-7b"), 8, 256, 2)
    assert cache == 2 * 32 * 32 * 128 * 8 * 256 * 2
    plain = estimate(load_config("llama-7b"), r=8, batch_size=8, seq_len=256).memory[1].activations
    assert grpo["lora"].activations == plain + cache
