"""The two outputs of a scan: one row per scored image, one per input that could not be scored.
Every input URI ends in exactly one of them."""
import pyarrow as pa

SCORE_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("sha256", pa.string()),  # of the file's bytes
    ("score", pa.float64()),  # higher = more likely generated: the head's, else anchor_score
    ("is_suspect", pa.bool_()),  # anchor: combined p-value below its fpr; head: score above 0
    ("anchor_score", pa.float64()),  # -log10 combined p-value: higher = further from real images
    ("head", pa.string()),  # the head's kind and id, or "" when the anchor decides
    ("p_semantic", pa.float64()),
    ("p_statistical", pa.float64()),
    ("semantic", pa.float64()),  # Mahalanobis distance of the semantic embedding
    ("statistical", pa.float64()),  # decoupled statistical distance = t2 + spe
    ("t2", pa.float64()),
    ("spe", pa.float64()),
    ("statistical_raw", pa.float64()),  # statistical distance without regression on content
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("preprocess", pa.string()),
    ("attention_positions", pa.float32()),  # effective number of positions, 1 / sum a^2
    ("anchor_id", pa.string()),
])

ERROR_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("stage", pa.string()),  # list, read, decode, embed or score
    ("error", pa.string()),
])


def error_row(uri: str, stage: str, error: str) -> dict:
    return {"uri": uri, "stage": stage, "error": error}
