"""A CRI v1 client speaking to containerd's CRI socket as the kubelet does (gRPC over a Unix
socket), for the shim's tests and `cargo xtask bench k8s`.

    cri_client.py SOCKET STUBS_DIR

STUBS_DIR holds api_pb2.py and api_pb2_grpc.py, generated from the pinned api.proto beside
this file (`python -m grpc_tools.protoc`). Reads one call a line on stdin,
{"method": "RunPodSandbox", "request": {...}} with the request in protobuf's JSON mapping, and
answers each with one line: {"response": {...}} (field names as in the proto, bytes as base64)
or {"error": {"code": "NOT_FOUND", "details": "..."}}. Stops at the end of its input.
"""

import importlib
import json
import sys

import grpc
from google.protobuf import json_format


def main():
    socket, stubs = sys.argv[1], sys.argv[2]
    sys.path.insert(0, stubs)
    api = importlib.import_module("api_pb2")
    api_grpc = importlib.import_module("api_pb2_grpc")
    channel = grpc.insecure_channel(f"unix://{socket}")
    services = [
        (api.DESCRIPTOR.services_by_name["RuntimeService"], api_grpc.RuntimeServiceStub(channel)),
        (api.DESCRIPTOR.services_by_name["ImageService"], api_grpc.ImageServiceStub(channel)),
    ]
    for line in sys.stdin:
        call = json.loads(line)
        method = call["method"]
        found = [(s.methods_by_name[method], stub) for s, stub in services if method in s.methods_by_name]
        if not found:
            answer = {"error": {"code": "UNKNOWN_METHOD", "details": f"no CRI method {method}"}}
        else:
            descriptor, stub = found[0]
            request = json_format.ParseDict(call.get("request", {}), getattr(api, descriptor.input_type.name)())
            try:
                response = getattr(stub, method)(request, timeout=call.get("timeout", 120))
                answer = {"response": json_format.MessageToDict(response, preserving_proto_field_name=True)}
            except grpc.RpcError as e:
                answer = {"error": {"code": e.code().name, "details": e.details()}}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
