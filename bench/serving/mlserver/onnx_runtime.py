"""A custom MLServer runtime that runs an ONNX model with onnxruntime (one session, one intra-op thread).

model-settings.json: {"implementation": "onnx_runtime.OnnxModel", "parameters": {"uri": "/path/model.onnx"}, ...}
"""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(self.settings.parameters.uri, options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(None, feeds)
        outputs = []
        for name, value in zip(self._outputs, results):
            if value.dtype == object:
                outputs.append(StringCodec.encode_output(name, [str(v) for v in value.ravel()]))
            else:
                outputs.append(NumpyCodec.encode_output(name, value))
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs)
