"""The scored data set that Score Image Model writes and Evaluate Model reads: its file and column names.

Light to import: evaluating needs no torch.
"""

SCORED_FILE = "scored.csv"
LABEL_COLUMN = "category"  # the true label, when the images had one
ORIGINAL_COLUMN = "original_path"  # the path an image had before convert, when recorded
PROBABILITY_PREFIX = "Scored Probabilities_"  # one column per label
SCORED_LABEL = "Scored Labels"  # the most probable label
META_FILE = "_meta.yaml"
IMAGE_ROOT = "image_root"  # in _meta.yaml: the folder the image column's names are relative to
TRAINED_MODEL = "trained_model"  # in _meta.yaml: the model directory that scored the images
WEIGHTS_SHA256 = "trained_model_sha256"  # in _meta.yaml: the sha256 of its weights file, which names the model
