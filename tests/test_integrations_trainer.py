"""Trainer output_dir checkpoints, TracInCheckpointCallback, and PEFT (LoRA) selection."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from integrations_helpers import char_tokenizer, text_datasets, tiny_gpt2
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_attrib.integrations.trainer import (
    CALLBACK_FILE,
    TracInCheckpointCallback,
    trainer_checkpoints,
)
from hf_attrib.integrations.transformers import task_from_pretrained

LR = 1e-3
MAX_STEPS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 4-step Trainer run saving at steps 2 and 4 (linear decay, no warm-up)."""
    out = tmp_path_factory.mktemp("run")
    tok = char_tokenizer()
    train, _ = text_datasets(n_train=8, duplicates=(0,))
    train = train.map(lambda r: tok(r["text"]), batched=True, remove_columns=["text"])
    callback = TracInCheckpointCallback()
    args = TrainingArguments(output_dir=str(out), max_steps=MAX_STEPS, save_steps=2,
                             logging_steps=1, learning_rate=LR, lr_scheduler_type="linear",
                             per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=train,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[callback])
    trainer.train()
    return out, callback, tok


def _linear_lr(step: int) -> float:
    """Rate the linear schedule applies at (1-based) optimiser step ``step``."""
    return LR * (1 - (step - 1) / MAX_STEPS)


def test_callback_records_exact_learning_rates(trained):
    out, callback, _ = trained
    assert [r["step"] for r in callback.records] == [2, 4]
    for record in callback.records:
        assert record["learning_rate"] == pytest.approx(_linear_lr(record["step"]), rel=1e-6)
        saved = json.loads((out / f"checkpoint-{record['step']}" / CALLBACK_FILE).read_text())
        assert saved == record
    assert callback.records[0]["learning_rate_sum"] == pytest.approx(_linear_lr(1)
                                                                     + _linear_lr(2))
    assert callback.step_rates == pytest.approx({s: _linear_lr(s) for s in range(1, 5)})


def test_output_dir_gives_checkpoints_and_step_sizes(trained):
    out, _, tok = trained
    run = trainer_checkpoints(out)
    assert [p.name for p in run.paths] == ["checkpoint-2", "checkpoint-4"]
    assert run.steps == [2, 4] and run.exact
    assert run.weights == pytest.approx([_linear_lr(2), _linear_lr(4)])
    interval = trainer_checkpoints(out, weights="interval").weights
    assert interval == pytest.approx([_linear_lr(1) + _linear_lr(2),
                                      _linear_lr(3) + _linear_lr(4)])

    task = task_from_pretrained(tiny_gpt2(seed=5), "causal-lm", layers="last:1",
                                checkpoints=out, processor=tok)
    assert [str(c) for c in task.checkpoints] == [str(p) for p in run.paths]
    assert task.weight_list == pytest.approx(run.weights)
    w0 = task.load_checkpoint(0).transformer.h[1].mlp.c_fc.weight.detach().clone()
    w1 = task.load_checkpoint(1).transformer.h[1].mlp.c_fc.weight.detach().clone()
    assert not torch.equal(w0, w1)

    train, test = text_datasets(n_train=6, duplicates=(1, 4))
    train_loader, test_loader = task.dataloader(train, 3), task.dataloader(test, 2)
    scores = task.attributor("tracin").attribute(train_loader, test_loader)
    assert task.attributor("tracin").weight_list == pytest.approx(run.weights)
    assert scores.argmax(0).tolist() == [1, 4]


def test_output_dir_as_the_model_argument(trained):
    out, _, _ = trained
    task = task_from_pretrained(out, "causal-lm", layers="last:1")
    assert [c.rsplit("/", 1)[-1] for c in task.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert task.weight_list == pytest.approx([_linear_lr(2), _linear_lr(4)])


def test_trainer_state_fallback_without_callback_files(trained, tmp_path):
    out, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for f in copy.glob(f"checkpoint-*/{CALLBACK_FILE}"):
        f.unlink()
    # logging_steps=1: trainer_state.json logs the applied rate at every step -> exact
    run = trainer_checkpoints(copy)
    assert run.exact and run.weights == pytest.approx([_linear_lr(2), _linear_lr(4)])
    # sparse logging: the nearest earlier logged rate, with a warning
    for state_file in copy.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        state["log_history"] = [h for h in state["log_history"] if h.get("step") in (1, 3)]
        state_file.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="nearest earlier logged rate"):
        run = trainer_checkpoints(copy)
    assert not run.exact
    assert run.weights == pytest.approx([_linear_lr(1), _linear_lr(3)])
    # nothing recorded: uniform weights, with a warning
    for state_file in copy.glob("checkpoint-*/trainer_state.json"):
        state_file.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert trainer_checkpoints(copy).weights is None
    assert any("weight every checkpoint by 1" in str(w.message) for w in caught)


def test_output_dir_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint-<step> folders"):
        trainer_checkpoints(tmp_path)


# --------------------------------------------------------------------------------------------
# PEFT
# --------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _lora_model():
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                             lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(tiny_gpt2(), config)


def test_peft_selects_only_lora_weights_and_attributes():
    model = _lora_model()
    task = task_from_pretrained(model, "causal-lm", processor=char_tokenizer())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert task.layer_name == trainable and len(trainable) == 4
    assert all("lora_" in n for n in task.layer_name)
    # only the adapters inside a selection are kept
    task1 = task_from_pretrained(model, "causal-lm", layers="last:1")
    assert task1.layer_name == [n for n in trainable if ".h.1." in n]
    train, test = text_datasets(n_train=6, duplicates=(2, 3))
    task.processor = char_tokenizer()
    scores = task.attributor("grad-cos").attribute(task.dataloader(train, 3),
                                                   task.dataloader(test, 2))
    assert scores.argmax(0).tolist() == [2, 3]
    # the gradient really is with respect to the adapter weights
    assert task.functions(0, task.layer_name).dim == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


def test_peft_selection_without_trainable_parameters_is_refused():
    model = _lora_model()
    with pytest.raises(ValueError, match=r"no trainable parameters of this PEFT model.*"
                                         r"Modules with adapters"):
        task_from_pretrained(model, "causal-lm",
                             layers=["base_model.model.transformer.h.1.mlp"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="is_trainable=True"):
        task_from_pretrained(model, "causal-lm")


def test_peft_adapter_folder_and_adapter_checkpoints(tmp_path):
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                             init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    task = task_from_pretrained(tmp_path / "adapter", "causal-lm")
    assert all("lora_" in n for n in task.layer_name)
    loaded = dict(task.model.named_parameters())
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(loaded[name], p)
    # adapter-only checkpoints (what a Trainer saves for a PEFT model) load into the task
    other = task_from_pretrained(tmp_path / "adapter", "causal-lm",
                                 checkpoints=[tmp_path / "adapter", tmp_path / "adapter"])
    with torch.no_grad():
        for n, p in other.model.named_parameters():
            if "lora_" in n:
                p.zero_()
    other.load_checkpoint(1)
    name = task.layer_name[0]
    torch.testing.assert_close(dict(other.model.named_parameters())[name], loaded[name])


def test_peft_full_checkpoints_must_fill_the_model():
    """A base model's state dict (names without ``base_model.model.``) loaded nothing into the
    PEFT model, silently: every checkpoint scored with the weights already there."""
    model = _lora_model()
    other = _lora_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    own = {k: v.clone() for k, v in other.state_dict().items()}
    task = task_from_pretrained(model, "causal-lm", processor=char_tokenizer(),
                                checkpoints=[own, own])
    task.load_checkpoint(1)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, own[name])
    base = {k: v.clone() for k, v in tiny_gpt2(seed=1).state_dict().items()}
    task = task_from_pretrained(_lora_model(), "causal-lm", processor=char_tokenizer(),
                                checkpoints=[base, base])
    with pytest.raises(ValueError, match=r"does not match the PEFT model.*not from the base"):
        task.load_checkpoint(1)
    partial = {k: v for k, v in own.items() if "lora_A" not in k}
    task = task_from_pretrained(_lora_model(), "causal-lm", processor=char_tokenizer(),
                                checkpoints=[partial, partial])
    with pytest.raises(ValueError, match=r"weights it lacks.*lora_A"):
        task.load_checkpoint(1)
