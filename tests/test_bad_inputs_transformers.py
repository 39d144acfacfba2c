"""Bad inputs on the transformers path (issue 11, item 7): each refused with an error that
names the problem and the fix, or handled correctly against a reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from integrations_helpers import char_tokenizer, text_datasets, tiny_bert, tiny_gpt2
from safetensors.torch import load_file

from hf_attrib.integrations.cli_attribute import load_any_dataset, report
from hf_attrib.integrations.transformers import task_from_pretrained

DUPS = (2, 5, 9)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from hf_attrib.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------
# Weights: safetensors only unless allow_pickle
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pickled_model(tmp_path_factory):
    """A save_pretrained folder whose weights are only pytorch_model.bin."""
    folder = tmp_path_factory.mktemp("pickled")
    tiny_bert().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_are_refused_without_opt_in(pickled_model):
    with pytest.raises(ValueError, match=r"only pickled weights \(pytorch_model.bin\).*"
                                         r"save_pretrained\(path\).*allow_pickle=True"):
        task_from_pretrained(pickled_model, "sequence-classification")


def test_pickled_weights_load_with_allow_pickle_and_a_warning(pickled_model):
    with pytest.warns(UserWarning, match="unpickles them, which can run arbitrary code"):
        task = task_from_pretrained(pickled_model, "sequence-classification",
                                    allow_pickle=True)
    loaded = torch.load(pickled_model / "pytorch_model.bin", weights_only=True)
    for name, tensor in task.model.state_dict().items():
        if name in loaded:
            torch.testing.assert_close(tensor, loaded[name])


def test_use_safetensors_false_needs_allow_pickle(pickled_model):
    with pytest.raises(ValueError, match=r"use_safetensors=False loads pickled weights.*"
                                         r"allow_pickle=True"):
        task_from_pretrained(pickled_model, "sequence-classification", use_safetensors=False)


def test_cli_refuses_pickled_weights_and_names_allow_pickle(pickled_model, tmp_path, capsys):
    train, test = text_datasets(labels=True)
    train.to_csv(str(tmp_path / "train.csv"))
    test.to_csv(str(tmp_path / "test.csv"))
    args = ["attribute", "--model", str(pickled_model), "--task", "sequence-classification",
            "--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv"),
            "--method", "grad-dot", "--layers", "classifier", "--no-progress",
            "--out", str(tmp_path / "s.safetensors")]
    code, _, err = _cli(capsys, *args)
    assert code == 2 and "--allow-pickle" in err and "pytorch_model.bin" in err
    with pytest.warns(UserWarning, match="arbitrary code"):
        code, out, err = _cli(capsys, *args, "--allow-pickle")
    assert code == 0, err
    assert "wrote" in out


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------
def _bert_task(num_labels: int = 3):
    model = tiny_bert(num_labels=num_labels)
    model.config.id2label = {0: "neg", 1: "mid", 2: "pos"}
    model.config.label2id = {"neg": 0, "mid": 1, "pos": 2}
    return task_from_pretrained(model, "sequence-classification", layers="classifier",
                                processor=char_tokenizer())


def test_string_labels_are_mapped_through_label2id():
    task = _bert_task()
    train, test = text_datasets(labels=True)
    names = {0: "neg", 1: "mid", 2: "pos"}
    named = train.map(lambda row: {"label": names[row["label"]]})
    assert isinstance(named[0]["label"], str)
    by_name = task.dataloader(named, batch_size=4)
    by_index = task.dataloader(train, batch_size=4)
    labels = torch.cat([b["labels"] for b in by_name])
    assert labels.tolist() == train["label"]
    test_loader = task.dataloader(test)
    torch.testing.assert_close(task.attributor("grad-dot").attribute(by_name, test_loader),
                               task.attributor("grad-dot").attribute(by_index, test_loader))


@pytest.mark.parametrize(("label", "fragment"), [
    ("positive", r"label 'positive' in column 'sentiment' is not one of the model's labels "
                 r"\['mid', 'neg', 'pos'\] \(config.label2id\)"),
    (3, r"label 3 in column 'sentiment' is outside the classification head: the model has "
        r"num_labels=3, so labels must be 0..2"),
    (-1, r"label -1 in column 'sentiment' is outside the classification head"),
    (-100, r"label -100 in column 'sentiment' is outside the classification head"),
])
def test_labels_the_head_cannot_score_are_refused(label, fragment):
    task = _bert_task()
    ds = Dataset.from_dict({"text": ["abc", "de", "fgh"], "sentiment": ["neg", "pos", label]
                            if isinstance(label, str) else [0, 2, label]})
    with pytest.raises(ValueError, match=fragment):
        task.dataloader(ds, label_column="sentiment")


def test_token_classification_keeps_ignored_minus_100_but_refuses_other_negatives():
    from integrations_helpers import tiny_bert_config
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_bert_config(num_labels=2)).eval()
    task = task_from_pretrained(model, "token-classification", processor=char_tokenizer())
    ok = Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9, 10]],
                            "labels": [[0, -100, 1], [1, 1, 0]]})
    assert next(iter(task.dataloader(ok)))["labels"].tolist() == [[0, -100, 1], [1, 1, 0]]
    bad = Dataset.from_dict({"input_ids": [[5, 6, 7]], "labels": [[0, -2, 1]]})
    with pytest.raises(ValueError, match="label -2 in column 'labels' is outside"):
        task.dataloader(bad)


# --------------------------------------------------------------------------------------------
# Data files and columns
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["data/nope.jsonl", "nope.csv", "./nope", "a/b/c",
                                  "~/nope.parquet"])
def test_missing_local_data_is_reported_as_missing(spec):
    with pytest.raises(FileNotFoundError, match=f"train dataset {spec} does not exist"):
        load_any_dataset(spec)


def test_cli_missing_data_file_names_the_path(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    code, _, err = _cli(capsys, "attribute", "--model", str(folder), "--task", "causal-lm",
                        "--train", "data/nope.jsonl", "--test", "data/nope.jsonl")
    assert code == 2
    assert "train dataset data/nope.jsonl does not exist" in err and "--train" in err


def test_missing_text_and_label_columns_name_the_option():
    task = _bert_task()
    ds = Dataset.from_dict({"body": ["abc", "de"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"no text column to tokenise.*\['body', 'label'\].*"
                                         r"text_column=\.\.\. \(CLI: --text-column\)"):
        task.dataloader(ds)
    with pytest.raises(ValueError, match=r"text column 'txt' is not in the dataset; its "
                                         r"columns are \['body', 'label'\].*--text-column"):
        task.dataloader(ds, text_column="txt")
    with pytest.raises(ValueError, match=r"label column 'y' is not in the dataset; its columns "
                                         r"are \['body', 'label'\].*--label-column"):
        task.dataloader(ds, text_column="body", label_column="y")


# --------------------------------------------------------------------------------------------
# TracInCP step sizes
# --------------------------------------------------------------------------------------------
def test_tracin_without_learning_rates_warns_step_size_one():
    task = task_from_pretrained(tiny_gpt2(), "causal-lm", layers="last:1",
                                processor=char_tokenizer())
    with pytest.warns(UserWarning, match="every step size is 1.*weight_list"):
        task.attributor("tracin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.attributor("tracin", weight_list=[0.01])


# --------------------------------------------------------------------------------------------
# Left padding
# --------------------------------------------------------------------------------------------
def _scores_and_losses(side: str):
    tok = char_tokenizer()
    tok.padding_side = side
    train, test = text_datasets(duplicates=DUPS)
    task = task_from_pretrained(tiny_gpt2(), "causal-lm", layers="last:1", processor=tok)
    train_loader = task.dataloader(train, batch_size=5)
    test_loader = task.dataloader(test, batch_size=2)
    first = next(iter(train_loader))
    params = {n: p.detach() for n, p in task.model.named_parameters()}
    losses = torch.cat([task.functions_.per_example(params, b)["loss"] for b in train_loader])
    scores = task.attributor("grad-dot").attribute(train_loader, test_loader)
    return first, losses, scores


def test_left_padding_gives_the_same_losses_and_scores_as_right_padding():
    right_batch, right_losses, right = _scores_and_losses("right")
    left_batch, left_losses, left = _scores_and_losses("left")
    assert left_batch["attention_mask"][:, 0].eq(0).any()  # really left-padded
    assert right_batch["attention_mask"][:, -1].eq(0).any()
    torch.testing.assert_close(left_losses, right_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-4 * float(right.abs().max()))
    # unpadded, one example at a time: the per-example loss of the batch is the sequence's own
    tok = char_tokenizer()
    task = task_from_pretrained(tiny_gpt2(), "causal-lm", processor=tok)
    ids = torch.tensor([tok(text_datasets(duplicates=DUPS)[0][0]["text"])["input_ids"]])
    alone = task.model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(left_losses[0], alone, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The attribute report
# --------------------------------------------------------------------------------------------
def test_report_lists_harmful_only_negative_and_helpful_only_positive():
    ds = Dataset.from_dict({"text": ["a", "b", "c"]})
    text = report(torch.tensor([[0.5], [1.0], [2.0]]), ds, ds.select([0]), top_k=2)
    harmful = text.split("most harmful:")[1].strip().splitlines()
    assert harmful == ["none"]
    helpful = text.split("most helpful:")[1].split("most harmful:")[0].strip().splitlines()
    assert [line.split()[0] for line in helpful] == ["+2.0000e+00", "+1.0000e+00"]
    text = report(torch.tensor([[-0.5], [1.0], [-2.0]]), ds, ds.select([0]), top_k=5)
    helpful = text.split("most helpful:")[1].split("most harmful:")[0].strip().splitlines()
    harmful = text.split("most harmful:")[1].strip().splitlines()
    assert [line.split()[0] for line in helpful] == ["+1.0000e+00"]
    assert [line.split()[0] for line in harmful] == ["-2.0000e+00", "-5.0000e-01"]
