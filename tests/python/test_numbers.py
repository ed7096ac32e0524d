"""Numbers that JSON cannot spell survive the trip (issue 13): NaN, +Inf and -Inf go out as the bare tokens Triton
and TF Serving write (`tritonclient` and Python's `json` read them back as the same floats; serde_json alone would
write null), come in the same way, and a finite number beyond its datatype's range is refused, not turned into Inf.
Ragged nested lists are refused on both REST protocols."""
import math

import numpy as np
import requests
import tritonclient.http as httpclient


def test_tritonclient_round_trips_nan_and_infinities_in_json(server):
    client = httpclient.InferenceServerClient(server.host)
    x = np.array([[math.nan, math.inf, -math.inf]], dtype=np.float32)
    inp = httpclient.InferInput("x", [1, 3], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    out = httpclient.InferRequestedOutput("y", binary_data=False)
    y = client.infer("id_fp32", [inp], outputs=[out]).as_numpy("y")
    assert np.isnan(y[0, 0]) and y[0, 1] == np.inf and y[0, 2] == -np.inf, y
    client.close()


def test_nonfinite_tokens_on_the_wire(server):
    body = '{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [NaN, Infinity, -Infinity]}]}'
    r = requests.post(f"{server.url}/v2/models/id_fp64/infer", data=body)
    assert r.status_code == 200, r.text
    assert '"data":[NaN,Infinity,-Infinity]' in r.text, r.text
    r = requests.post(f"{server.url}/v1/models/id_fp32:predict", data='{"instances": [[NaN, -Infinity, 1.5]]}')
    assert r.status_code == 200, r.text
    assert r.text == '{"predictions":[[NaN,-Infinity,1.5]]}', r.text


def test_numbers_out_of_range_and_ragged_lists_are_refused(server):
    cases = [
        ("/v2/models/id_fp32/infer", {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                                   "data": [1, 3.5e38, 0]}]}, "element 1: 3.5e38 is out of range for FP32"),
        ("/v2/models/id_fp16/infer", {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP16",
                                                   "data": [1, 2, 70000]}]}, "out of range for FP16"),
        ("/v2/models/id_fp32/infer", {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32",
                                                   "data": [[1, 2, 3, 4], [5, 6]]}]}, "ragged nested list"),
        ("/v1/models/id_fp32:predict", {"instances": [[1, 2, 3], [4]]}, "instance 1 has shape [1] but instance 0 has [3]"),
        ("/v1/models/id_fp32:predict", {"inputs": [[1, 2, 3], [4, [5], 6]]}, "ragged nested list"),
    ]
    for path, body, fragment in cases:
        r = requests.post(server.url + path, json=body)
        assert r.status_code == 400 and fragment in r.json()["error"], (path, r.status_code, r.text)
    # 1e400 does not fit any float: the error names the element.
    r = requests.post(f"{server.url}/v2/models/id_fp64/infer",
                      data='{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 1e400]}]}')
    assert r.status_code == 400 and "element 2: number out of range" in r.json()["error"], r.text
