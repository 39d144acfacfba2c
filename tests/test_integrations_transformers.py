"""hf_attrib.integrations.transformers on tiny offline GPT-2 / BERT models built from configs."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from integrations_helpers import (
    VOCAB,
    char_tokenizer,
    text_datasets,
    tiny_bert,
    tiny_bert_config,
    tiny_gpt2,
)
from torch.utils.data import SequentialSampler
from transformers import (
    BertForMaskedLM,
    BertForTokenClassification,
    GPT2ForSequenceClassification,
    GPT2Model,
    ViTConfig,
    ViTForImageClassification,
)

from hf_attrib.func.utils import per_sample_grad
from hf_attrib.integrations.transformers import (
    find_blocks,
    task_from_pretrained,
)


def _params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------
# Loss / target functions against the models' own outputs (closed form)
# --------------------------------------------------------------------------------------------
def test_causal_lm_loss_and_target_match_model_loss():
    model = tiny_gpt2()
    task = task_from_pretrained(model, "causal-lm")
    ids = torch.randint(4, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    expected = model(input_ids=ids, labels=ids).loss
    loss = task.loss_func(_params(model), batch)
    target = task.target_func(_params(model), batch)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    # target = log-likelihood of the 8 predicted tokens = -8 * mean NLL
    torch.testing.assert_close(target, -8 * expected, atol=1e-4, rtol=1e-5)
    # padded with -100 labels: same value as the unpadded example
    pad = torch.zeros(1, 4, dtype=torch.long)
    padded = {"input_ids": torch.cat([ids, pad], 1),
              "attention_mask": torch.cat([torch.ones_like(ids), pad], 1),
              "labels": torch.cat([ids, pad - 100], 1)}
    torch.testing.assert_close(task.loss_func(_params(model), padded), expected, atol=1e-5,
                               rtol=1e-5)
    assert task.correct_probability_func is None  # d loss / d log-likelihood is constant


def test_sequence_classification_loss_margin_probability():
    model = tiny_bert()
    task = task_from_pretrained(model, "sequence-classification")
    ids = torch.randint(4, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    label = torch.tensor([2])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label}
    out = model(input_ids=ids, labels=label)
    p = torch.softmax(out.logits, -1)[0, 2]
    torch.testing.assert_close(task.loss_func(_params(model), batch), out.loss)
    torch.testing.assert_close(task.target_func(_params(model), batch),
                               torch.log(p / (1 - p)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(task.correct_probability_func(_params(model), batch), p)
    assert task.rps_layer_name == "classifier"


def test_token_classification_and_masked_lm_losses_match_model():
    torch.manual_seed(0)
    tok_model = BertForTokenClassification(tiny_bert_config(num_labels=4)).eval()
    ids = torch.randint(4, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[-100, 1, 3, 0, -100, 2, 2, -100]])
    task = task_from_pretrained(tok_model, "token-classification")
    torch.testing.assert_close(task.loss_func(_params(tok_model), {"input_ids": ids,
                                                                    "labels": labels}),
                               tok_model(input_ids=ids, labels=labels).loss)
    mlm = BertForMaskedLM(tiny_bert_config()).eval()
    task = task_from_pretrained(mlm, "masked-lm")
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4]] = ids[0, [1, 4]]
    masked = ids.clone()
    masked[0, [1, 4]] = 2
    batch = {"input_ids": masked, "labels": labels}
    expected = mlm(input_ids=masked, labels=labels).loss
    torch.testing.assert_close(task.loss_func(_params(mlm), batch), expected)
    torch.testing.assert_close(task.target_func(_params(mlm), batch), -2 * expected)


def test_image_classification_loss_matches_model():
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                       num_labels=3)
    model = ViTForImageClassification(config).eval()
    x = torch.randn(1, 3, 8, 8)
    y = torch.tensor([1])
    task = task_from_pretrained(model, "image-classification", layers="last:1")
    torch.testing.assert_close(task.loss_func(_params(model), {"pixel_values": x, "labels": y}),
                               model(pixel_values=x, labels=y).loss)
    assert task.rps_layer_name == "classifier"
    ds = Dataset.from_dict({"pixel_values": torch.randn(4, 3, 8, 8).numpy(),
                            "label": [0, 1, 2, 0]})
    loader = task.dataloader(ds, batch_size=2)
    scores = task.attributor("grad-cos").attribute(loader, loader)
    assert scores.shape == (4, 4)
    assert torch.allclose(scores.diagonal(), torch.ones(4), atol=1e-4)


# --------------------------------------------------------------------------------------------
# Padding invariance under vmap (per-example gradients)
# --------------------------------------------------------------------------------------------
def _gpt2_classifier(pad_token_id: int | None = 0) -> GPT2ForSequenceClassification:
    """A decoder classifier: it scores the last token that is not ``pad_token_id``."""
    torch.manual_seed(0)
    config = tiny_gpt2().config
    config.num_labels, config.pad_token_id = 3, pad_token_id
    return GPT2ForSequenceClassification(config).eval()


@pytest.mark.parametrize("kind", ["causal-lm", "sequence-classification", "decoder-classifier"])
def test_padding_does_not_change_per_example_gradients(kind):
    model = {"causal-lm": tiny_gpt2, "sequence-classification": tiny_bert,
             "decoder-classifier": _gpt2_classifier}[kind]()
    decoder = kind == "decoder-classifier"
    kind = "sequence-classification" if decoder else kind
    task = task_from_pretrained(model, kind, layers="last:1")
    fns = task.functions(0, task.layer_name)
    ids = torch.randint(4, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    label = ids.clone() if kind == "causal-lm" else torch.tensor([1])
    alone = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label}
    other = torch.randint(4, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    padded_ids = torch.cat([torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1), other])
    mask = torch.ones_like(padded_ids)
    mask[0, 6:] = 0
    if kind == "causal-lm":
        labels = padded_ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.tensor([1, 0])
    batch = {"input_ids": padded_ids, "attention_mask": mask, "labels": labels}
    for grads in (per_sample_grad(fns.loss, fns.theta, alone),):
        in_batch = per_sample_grad(fns.loss, fns.theta, batch)
        torch.testing.assert_close(in_batch[0], grads[0], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(in_batch[1], grads[0], atol=1e-3)
    # the unmasked padding would change the gradient: the mask really is applied
    unmasked = dict(batch, attention_mask=torch.ones_like(mask))
    if kind == "sequence-classification" and not decoder:
        changed = per_sample_grad(fns.loss, fns.theta, unmasked)[0]
        assert not torch.allclose(changed, grads[0], atol=1e-4)
    if decoder:  # what the refused config does: the padded example scored from a pad token
        model.config.pad_token_id = None
        changed = per_sample_grad(fns.loss, fns.theta, batch)[0]
        assert not torch.allclose(changed, grads[0], atol=1e-4)


# --------------------------------------------------------------------------------------------
# End to end from datasets.Dataset
# --------------------------------------------------------------------------------------------
DUPS = (2, 5, 9)


def test_gpt2_end_to_end_duplicates_rank_first():
    tok = char_tokenizer()
    train, test = text_datasets(duplicates=DUPS)
    task = task_from_pretrained(tiny_gpt2(), "causal-lm", layers="last:1", processor=tok)
    train_loader = task.dataloader(train, batch_size=5)
    test_loader = task.dataloader(test, batch_size=2)
    assert isinstance(train_loader.sampler, SequentialSampler)
    first = next(iter(train_loader))
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    assert (first["labels"][first["attention_mask"] == 0] == -100).all()
    for method, kwargs in [("trak", {"projector_kwargs": {"proj_dim": 64}}),
                           ("grad-cos", {})]:
        scores = task.attributor(method, **kwargs).attribute(train_loader, test_loader)
        assert scores.shape == (12, 3) and torch.isfinite(scores).all()
        assert scores.argmax(0).tolist() == list(DUPS), method
    # Grad-Cos with a log-likelihood target: the duplicate's cosine is exactly +1
    assert torch.allclose(scores[list(DUPS), [0, 1, 2]], torch.ones(3), atol=1e-4)


def test_bert_classifier_end_to_end_duplicates_rank_first():
    tok = char_tokenizer()
    train, test = text_datasets(duplicates=DUPS, labels=True, seed=1)
    task = task_from_pretrained(tiny_bert(), "sequence-classification", layers="last:1",
                                processor=tok)
    train_loader = task.dataloader(train, batch_size=4)
    test_loader = task.dataloader(test, batch_size=3)
    assert task.correct_probability_func is not None
    for method, kwargs in [("trak", {"projector_kwargs": {"proj_dim": 64}}),
                           ("grad-cos", {})]:
        scores = task.attributor(method, **kwargs).attribute(train_loader, test_loader)
        assert scores.argmax(0).tolist() == list(DUPS), method
    rps = task.attributor("rps").attribute(train_loader, test_loader)
    assert rps.shape == (12, 3) and torch.isfinite(rps).all()
    # TracInCP over two (here equal) checkpoints: the weighted sum of their Grad-Dot scores
    state = task.model.state_dict()
    two = task_from_pretrained(task.model, "sequence-classification", layers="last:1",
                               processor=tok, checkpoints=[state, state])
    tracin = two.attributor("tracin", weight_list=[1.0, 2.0]).attribute(train_loader,
                                                                         test_loader)
    dot = task.attributor("grad-dot").attribute(train_loader, test_loader)
    torch.testing.assert_close(tracin, 3 * dot, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["causal-lm", "sequence-classification"])
def test_if_cg_with_large_damping_approaches_grad_dot(kind):
    """(H + lam I)^-1 ~ I/lam for lam >> ||H||: IF-CG * n * lam ~ Grad-Dot (closed form)."""
    tok = char_tokenizer()
    labels = kind == "sequence-classification"
    train, test = text_datasets(n_train=8, duplicates=(1, 6), labels=labels)
    model = tiny_gpt2() if kind == "causal-lm" else tiny_bert()
    task = task_from_pretrained(model, kind, layers="last:1", processor=tok)
    train_loader, test_loader = task.dataloader(train, 4), task.dataloader(test, 2)
    lam = 1e4
    cg = task.attributor("if-cg", regularization=lam, max_iter=20).attribute(train_loader,
                                                                             test_loader)
    dot = task.attributor("grad-dot").attribute(train_loader, test_loader)
    torch.testing.assert_close(cg * 8 * lam, dot, rtol=2e-2, atol=2e-2 * dot.abs().max().item())
    assert cg.argmax(0).tolist() == [1, 6]


def test_tracin_sums_checkpoints_with_their_weights():
    tok = char_tokenizer()
    train, test = text_datasets(n_train=6, duplicates=(0, 3))
    a, b = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    task = task_from_pretrained(a, "causal-lm", layers="last:1", processor=tok,
                                checkpoints=[a.state_dict(), b.state_dict()])
    train_loader, test_loader = task.dataloader(train, 3), task.dataloader(test, 2)
    tracin = task.attributor("tracin", weight_list=[0.5, 2.0]).attribute(train_loader,
                                                                          test_loader)
    parts = []
    for seed in (0, 1):  # fresh models: the task loads its checkpoints into `a`
        t = task_from_pretrained(tiny_gpt2(seed=seed), "causal-lm", layers="last:1", processor=tok)
        parts.append(t.attributor("grad-dot").attribute(train_loader, test_loader))
    torch.testing.assert_close(tracin, 0.5 * parts[0] + 2.0 * parts[1], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Layers, data helpers
# --------------------------------------------------------------------------------------------
def test_last_n_blocks_are_found_generically():
    assert find_blocks(tiny_gpt2()) == ("transformer.h", 2)
    assert find_blocks(tiny_bert()) == ("bert.encoder.layer", 2)
    task = task_from_pretrained(tiny_gpt2(), "causal-lm", layers="last:2")
    assert task.layer_name[0].startswith("transformer.h.0.")
    assert all(n.startswith("transformer.h.") for n in task.layer_name)
    names = task.select_parameters(task.layer_name)
    expected = [n for n, _ in tiny_gpt2().named_parameters() if n.startswith("transformer.h.")]
    assert names == expected
    task = task_from_pretrained(tiny_bert(), "sequence-classification",
                                layers=["bert.pooler", "classifier.weight"])
    assert task.layer_name == ["bert.pooler.dense.weight", "bert.pooler.dense.bias",
                               "classifier.weight"]


def test_masked_lm_loader_masks_reproducibly():
    tok = char_tokenizer()
    ds = Dataset.from_dict({"text": ["abcdefghijklmnop", "hello world again"]})
    task = task_from_pretrained(BertForMaskedLM(tiny_bert_config()).eval(), "masked-lm",
                                processor=tok)
    one = next(iter(task.dataloader(ds, 2)))
    two = next(iter(task.dataloader(ds, 2)))
    assert torch.equal(one["input_ids"], two["input_ids"])
    assert torch.equal(one["labels"], two["labels"])
    chosen = one["labels"] != -100
    assert chosen.any() and (one["attention_mask"][chosen] == 1).all()


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------
def test_task_kind_mismatch_is_refused(tmp_path):
    torch.manual_seed(0)
    base = GPT2Model(tiny_gpt2().config)
    with pytest.raises(ValueError, match=r"causal-lm.*GPT2Model.*no task head"):
        task_from_pretrained(base, "causal-lm")
    with pytest.raises(ValueError, match=r"BertForSequenceClassification.*"
                                         r"task='sequence-classification'"):
        task_from_pretrained(tiny_bert(), "causal-lm")
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"config.architectures.*no task head"):
        task_from_pretrained(tmp_path / "base", "causal-lm")
    with pytest.raises(ValueError, match="unknown task kind"):
        task_from_pretrained(tiny_gpt2(), "summarization")


def test_batch_without_labels_is_refused():
    model = tiny_gpt2()
    task = task_from_pretrained(model, "causal-lm")
    ids = torch.randint(4, VOCAB, (1, 5))
    with pytest.raises(ValueError, match=r"no 'labels'.*DataCollatorForLanguageModeling"):
        task.loss_func(_params(model), {"input_ids": ids})
    task = task_from_pretrained(tiny_bert(), "sequence-classification")
    with pytest.raises(ValueError, match="no 'labels'"):
        task.attributor("grad-dot").attribute([{"input_ids": ids}], [{"input_ids": ids}])
    train, _ = text_datasets(n_train=3, duplicates=(0,))
    with pytest.raises(ValueError, match="needs a 'label' or 'labels' column"):
        task_from_pretrained(tiny_bert(), "sequence-classification",
                             processor=char_tokenizer()).dataloader(train)


def test_decoder_classifier_without_pad_token_id_is_refused():
    """Without config.pad_token_id GPT-2's classifier takes the last position of a batch of
    one (a per-example gradient): a right-padded example was classified from padding."""
    with pytest.raises(ValueError, match=r"GPT2ForSequenceClassification's config has no "
                                         r"pad_token_id.*model.config.pad_token_id ="):
        task_from_pretrained(_gpt2_classifier(None), "sequence-classification",
                             processor=char_tokenizer())


def test_tokenizer_without_pad_token_is_refused():
    tok = char_tokenizer(pad=False)
    train, _ = text_datasets(n_train=3, duplicates=(0,))
    task = task_from_pretrained(tiny_gpt2(), "causal-lm", processor=tok)
    with pytest.raises(ValueError, match=r"no pad token.*tokenizer.pad_token = tokenizer.eos"):
        task.dataloader(train)
    tok.pad_token = tok.eos_token  # the suggested fix works
    batch = next(iter(task.dataloader(train, batch_size=3)))
    assert batch["input_ids"].shape[0] == 3


def test_causal_lm_labels_keep_real_eos_tokens_when_pad_is_eos():
    """With the suggested pad_token = eos_token, a real end-of-sequence token is labelled like
    any token (DataCollatorForLanguageModeling masked it with the padding), as the stacking
    collator of equal-length examples does."""
    tok = char_tokenizer(pad=False)
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    task = task_from_pretrained(tiny_gpt2(), "causal-lm", processor=tok)
    texts = Dataset.from_dict({"text": ["ab" + tok.eos_token, "abcd" + tok.eos_token]})
    batch = next(iter(task.dataloader(texts, batch_size=2)))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids[0, 2] == eos and ids[0, 3:].eq(eos).all()  # its eos, then padding (also eos)
    assert labels[0].tolist() == [*ids[0, :3].tolist(), -100, -100]
    assert labels[1].tolist() == ids[1].tolist()
    alone = next(iter(task.dataloader(texts.select([0]), batch_size=1)))
    assert alone["labels"][0].tolist() == labels[0, :3].tolist()


def test_word_level_token_labels_are_refused():
    """Word labels beside sub-word tokens were padded with -100 and paired word i with
    token i (the [CLS] token first), silently."""
    model = BertForTokenClassification(tiny_bert_config(num_labels=2)).eval()
    task = task_from_pretrained(model, "token-classification", processor=char_tokenizer())
    words = Dataset.from_dict({"text": ["ab cd", "abc de"], "labels": [[0, 1], [1, 0]]})
    with pytest.raises(ValueError, match=r"one label per token, but example 0 has 2 labels "
                                         r"for 5 tokens.*word_ids"):
        task.dataloader(words)


def test_a_class_label_column_is_not_a_language_models_labels():
    """A 'label' column beside the text (a classification dataset) is not the LM's labels."""
    train = Dataset.from_dict({"text": ["abc", "abcde"], "label": [0, 1]})
    task = task_from_pretrained(tiny_gpt2(), "causal-lm", processor=char_tokenizer())
    batch = next(iter(task.dataloader(train, batch_size=2)))
    assert batch["labels"].shape == batch["input_ids"].shape
    assert torch.isfinite(task.attributor("grad-dot").self_attribute(
        task.dataloader(train, batch_size=2))).all()


def test_unknown_layer_names_are_refused():
    with pytest.raises(ValueError, match=r"unknown layer name 'transformer.h.7'.*transformer.h"):
        task_from_pretrained(tiny_gpt2(), "causal-lm", layers=["transformer.h.7"])
    with pytest.raises(ValueError, match=r"model has 2 blocks"):
        task_from_pretrained(tiny_gpt2(), "causal-lm", layers="last:3")
    with pytest.raises(ValueError, match=r"'last:N'"):
        task_from_pretrained(tiny_gpt2(), "causal-lm", layers="last:two")


def test_remote_code_is_not_run_without_trust(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    sentinel = tmp_path / "ran"
    (folder / "config.json").write_text(
        '{"model_type": "evil", "architectures": ["EvilForCausalLM"], '
        '"auto_map": {"AutoConfig": "configuration_evil.EvilConfig", '
        '"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}')
    code = f"open({str(sentinel)!r}, 'w').write('x')\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)
    with pytest.raises(ValueError, match="trust_remote_code"):
        task_from_pretrained(folder, "causal-lm")
    assert not sentinel.exists()


def test_pre_tokenised_datasets_need_no_tokenizer_unless_padding():
    task = task_from_pretrained(tiny_gpt2(), "causal-lm")
    same = Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [9, 10, 11, 12], [4, 4, 5, 5]]})
    batch = next(iter(task.dataloader(same, batch_size=3)))
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["input_ids"].tolist()[1] == [9, 10, 11, 12]
    ragged = Dataset.from_dict({"input_ids": [[5, 6, 7], [9, 10, 11, 12]]})
    with pytest.raises(ValueError, match="need padding, so pass the tokenizer"):
        task.dataloader(ragged)


def test_folder_without_tokenizer_files_gets_no_tokenizer(tmp_path):
    # transformers would build an empty tokenizer from config.json alone; it must not be used
    tiny_gpt2().save_pretrained(tmp_path / "m")
    task = task_from_pretrained(tmp_path / "m", "causal-lm")
    assert task.processor is None
    char_tokenizer().save_pretrained(tmp_path / "m")
    assert len(task_from_pretrained(tmp_path / "m", "causal-lm").processor) == VOCAB
