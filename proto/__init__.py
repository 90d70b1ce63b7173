"""The protocol shared by the irmd, the IPCPs and the flow library, depending on none of them:
control messages, QoS specs, names and their hashes, error codes and the control-channel client."""
