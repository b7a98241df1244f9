"""Short value names keep a graph valid when an If branch reads a value of the graph around it (TorchScript's
exporter writes a squeeze of a dynamic axis so)."""

import onnx
import onnxruntime
import numpy as np
from onnx import TensorProto, helper

from tfmq.export.onnx_export import _compact_value_names


def test_a_branch_reads_the_outer_value_under_its_new_name() -> None:
    doubled = helper.make_node("Add", ["x", "x"], ["/model/doubled_output_0"])
    condition = helper.make_node("Constant", [], ["/model/condition_output_0"],
                                 value=helper.make_tensor("c", TensorProto.BOOL, [], [True]))
    branch = helper.make_graph([helper.make_node("Identity", ["/model/doubled_output_0"], ["branch_out"])], "branch",
                               [], [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [2])])
    choose = helper.make_node("If", ["/model/condition_output_0"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([doubled, condition, choose], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _compact_value_names(model)
    onnx.checker.check_model(model)
    assert model.graph.node[0].output[0] == "v0"
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"x": np.array([1.0, 2.0], np.float32)})[0], [2.0, 4.0])
