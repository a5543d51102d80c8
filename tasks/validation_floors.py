"""The validation gate's default floors, apart from the gate itself (tasks.validate): the CLI and the
flow parameters name them as defaults when they are imported, and the gate loads torch and faiss."""

DEFAULT_MIN_RECALL = 0.90  # recall@10 of the index against exact search
DEFAULT_MIN_SELF_RETRIEVAL = 0.98  # share of sampled passages that their own vector finds first
DEFAULT_COUNT_TOLERANCE = 0.20  # how far the passage count may move from the previous ready version's
