"""The MLflow model of a trained sentiment model: raw review text in, P(positive) out.

An MLflow "model from code" (logged by stages/tracking.py): this file runs wherever the model is
loaded, so nothing here may depend on the project's directory. The model folder travels as the
artifact "model_dir" and `rnn` as the model's code: mlflow, numpy and pandas are all it needs.
"""

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

import rnn      # the copy logged with the model (its code path) comes first on sys.path
from rnn.config import MAX_REVIEW_BYTES


def reviews(model_input: pd.DataFrame) -> list[str]:
    """The `text` column, each a string of at most MAX_REVIEW_BYTES of UTF-8, else an MlflowException
    (HTTP 400) naming the field: the signature lets a mix of strings and others (or NaN) through."""
    if "text" not in model_input.columns:
        fields = ", ".join(map(str, model_input.columns))
        raise MlflowException.invalid_parameter_value(f"no field 'text' (fields: {fields})")
    texts = model_input["text"].tolist()
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            what = "null" if text is None or text != text else f"{type(text).__name__} {text!r:.40}"
            raise MlflowException.invalid_parameter_value(
                f"field 'text' of row {row}: a review must be a string, not {what}")
        # len() first: a string with more characters has more bytes, and is not encoded for nothing.
        if len(text) > MAX_REVIEW_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_REVIEW_BYTES:
            raise MlflowException.invalid_parameter_value(
                f"field 'text' of row {row}: a review may have at most {MAX_REVIEW_BYTES} bytes of UTF-8 "
                f"({MAX_REVIEW_BYTES >> 20} MiB), this one has more")
    return texts


class SentimentModel(mlflow.pyfunc.PythonModel):
    """`rnn.load_model` behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        self.predictor = rnn.load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        """model_input: a `text` column (the signature's input). Returns P(positive) (N,) float64."""
        return self.predictor.predict_proba(reviews(model_input))


mlflow.models.set_model(SentimentModel())
