//! What every decoder target checks about what it decoded: each tensor's data fills its shape, and all of it
//! together takes no more memory than the budget of a request of that size (`ferry_server::infer::Budget`).

use ferry_model::NamedTensor;
use ferry_server::infer::{memory_cost, Budget};

pub fn decoded(inputs: &[NamedTensor], request_bytes: usize) {
    for input in inputs {
        let n = ferry_model::element_count(&input.tensor.shape);
        assert_eq!(n, Some(input.tensor.data.len()), "{}", input.name);
    }
    let used: usize = inputs.iter().map(|i| memory_cost(&i.tensor.data)).sum();
    let total = Budget::for_request(request_bytes).total();
    assert!(used <= total, "{used} bytes decoded from {request_bytes} (budget {total})");
}
