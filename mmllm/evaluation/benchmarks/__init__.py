"""Standard benchmarks for `mmllm eval`, each read from local files in its official layout (no downloads).

    mmllm eval --model DIR --tasks vqav2,mmbench --data vqav2=/data/vqav2 --data mmbench=/data/MMBench_DEV_EN.tsv

`--data NAME=PATH` (repeatable; `EvalSettings.data` in Python) says where a benchmark's files are;
a benchmark task without it is refused before the model loads. The files are read once, before
any inference: a missing file or a wrong layout is a one-line error naming the path, and a
malformed row is skipped and counted in results.json (base.py). `--limit N` scores the first N
rows (questions; MME images; MMBench questions, each asked in all its rotations); without it,
every row.

    task          PATH                                 metrics (primary first)                       module
    vqav2         dir: questions and annotations JSON,  VQA accuracy, per answer type                 vqa.py
                  val2014/
    gqa           dir: testdev_balanced_questions.json, exact match after VQA normalisation           vqa.py
                  images/
    textvqa       dir: TextVQA_0.5.1_val.json,          VQA accuracy (EvalAI normalisation)           vqa.py
                  train_images/
    pope          dir: coco_pope_*.json, val2014/       F1, accuracy, precision, recall, yes ratio    yes_no.py
    mme           dir: the 14 subtask dirs              perception, cognition, per-subtask scores     yes_no.py
    mmbench       the official TSV file                 CircularEval accuracy, vanilla accuracy       choice.py
    scienceqa     dir: problems.json, pid_splits.json,  accuracy, accuracy on image questions         choice.py
                  images/
    coco-caption  dir: annotations/, val2014/           CIDEr, BLEU-4                                 captions.py
    librispeech   a split dir (e.g. test-clean)         corpus WER via jiwer                          asr.py

Each module's docstring gives the exact layout, the official scoring it reproduces, and the
prompt convention (LLaVA-1.5's, or lmms-eval's where LLaVA has none) with its source.
"""

from mmllm.evaluation.benchmarks.asr import LibriSpeechTask
from mmllm.evaluation.benchmarks.base import BenchmarkTask
from mmllm.evaluation.benchmarks.captions import CocoCaptionTask
from mmllm.evaluation.benchmarks.choice import MMBenchTask, ScienceQATask
from mmllm.evaluation.benchmarks.vqa import GQATask, TextVQATask, VQAv2Task
from mmllm.evaluation.benchmarks.yes_no import MMETask, PopeTask
from mmllm.evaluation.tasks import register_task

BENCHMARKS = (
    VQAv2Task,
    GQATask,
    TextVQATask,
    PopeTask,
    MMETask,
    MMBenchTask,
    ScienceQATask,
    CocoCaptionTask,
    LibriSpeechTask,
)

for _benchmark in BENCHMARKS:
    register_task(_benchmark())

__all__ = ["BENCHMARKS", "BenchmarkTask"]
