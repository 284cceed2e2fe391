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

import rnn      # the copy logged with the model (its code path) comes first on sys.path


class SentimentModel(mlflow.pyfunc.PythonModel):
    """`rnn.load_model` behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        self.predictor = rnn.load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        """model_input: a `text` column (the signature's input). Returns P(positive) (N,) float64."""
        return self.predictor.predict_proba([str(t) for t in model_input["text"]])


mlflow.models.set_model(SentimentModel())
