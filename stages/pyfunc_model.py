"""The MLflow model of a trained sentiment model: raw review text in, P(positive) out.

Logged by stages/tracking.py as MLflow "models from code": MLflow copies this file into the logged
model and runs it wherever the model is loaded, so nothing here may depend on the project's working
directory. The model folder (models/<cell>/) travels as the artifact "model_dir" and the `rnn`
package as the model's code, so a fresh process loads it with only mlflow, numpy and pandas:

    mlflow.pyfunc.load_model("runs:/<run id>/model").predict(pd.DataFrame({"text": [...]}))
    mlflow models serve -m runs:/<run id>/model --env-manager local
"""

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

import rnn      # the copy logged with the model (its code path) comes first on sys.path
from rnn.config import MAX_REVIEW_BYTES


def reviews(model_input: pd.DataFrame) -> list[str]:
    """The `text` column, each a string of at most MAX_REVIEW_BYTES of UTF-8; anything else raises an
    MlflowException naming the field, which the scoring server answers with HTTP 400. (The signature's
    string column refuses a missing column or one of numbers only, but lets a mix through: pandas
    holds it as objects, a null among strings as NaN.)"""
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
