"""IndexCallback: a Trainer run ends with the trained model's attribution index built."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from integrations_helpers import char_tokenizer, random_texts, tiny_gpt2
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_attrib.index import Index, IndexCallback
from hf_attrib.integrations.transformers import task_from_pretrained

FACTORED = {"proj_type": "factored", "proj_dim": 128}


@pytest.mark.parametrize("at", ["train_end", "last_epoch"])
def test_trainer_run_builds_the_index_of_the_trained_model(tmp_path, at):
    tok = char_tokenizer()
    texts = Dataset.from_dict({"text": random_texts(8, 0)})
    tokenized = texts.map(lambda r: tok(r["text"]), batched=True, remove_columns=["text"])
    callback = IndexCallback(texts, tmp_path / "index", method="grad-dot", at=at,
                             method_kwargs={"projector_kwargs": FACTORED}, shard_rows=4,
                             batch_size=4)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), num_train_epochs=2,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no")
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=args, train_dataset=tokenized, processing_class=tok,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[callback])
    trainer.train()
    assert callback.result is not None and callback.result.complete
    assert callback.built_at == ("train_end" if at == "train_end" else "epoch 2")
    assert model.training  # handed back to the Trainer as it was
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The index is the trained weights': it opens with them, and its scores are theirs.
    task = task_from_pretrained(model, "causal-lm", processor=tok)
    att = task.attributor("grad-dot", projector_kwargs=FACTORED)
    test = Dataset.from_dict({"text": random_texts(2, 3)})
    got = Index.open(tmp_path / "index", task=att).scores(test)
    ref = att.attribute(task.dataloader(texts, batch_size=4), task.dataloader(test, batch_size=4))
    assert torch.allclose(got, ref, rtol=0, atol=2e-3 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="weights"):
        Index.open(tmp_path / "index", task=task_from_pretrained(tiny_gpt2(), "causal-lm",
                                                                  processor=tok))
