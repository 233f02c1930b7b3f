"""hal's conformance suite on onnxruntime:cpu: the 3-line pattern any plug-in copies."""

import pytest

from hal.testing.conformance import check_case, conformance_cases


@pytest.mark.parametrize("case", conformance_cases("onnxruntime:cpu"), ids=str)
def test_conformance(case):
    check_case("onnxruntime:cpu", case)
