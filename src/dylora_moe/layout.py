"""The names of the files and folders this package writes: adapter checkpoints and run folders (stdlib only).

One place, at the bottom of the package, so that the core (``serialization.py``), the shared helpers
(``common/runs.py``) and the command line agree without importing each other::

    runs/cpu-demo/                      a run folder
      checkpoint-40/                    CHECKPOINT_PREFIX + step: trainer_state.json (STATE_FILE), adapter/, ...
        adapter/                        ADAPTER_DIR: an adapter folder
          dylora_moe_config.json        CONFIG_FILE
          dylora_moe_weights.safetensors  WEIGHTS_FILE
      final/                            FINAL_DIR: the final adapter folder, with its model card (MODEL_CARD_FILE)
      train_config.json                 TRAIN_CONFIG_FILE
    eval/humaneval/                     an evaluation folder: results.jsonl, summary.json and, while it runs,
      generation.partial.jsonl          JOURNAL_FILE (the samples generated so far)
"""

CONFIG_FILE = "dylora_moe_config.json"
WEIGHTS_FILE = "dylora_moe_weights.safetensors"
MODEL_CARD_FILE = "README.md"
CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_DIR = "adapter"
FINAL_DIR = "final"
STATE_FILE = "trainer_state.json"
TRAIN_CONFIG_FILE = "train_config.json"
JOURNAL_FILE = "generation.partial.jsonl"
