# METADATA
# title: OPA API authorization
# description: |
#   Enforced by OPA when it runs with --authentication=token
#   --authorization=basic (the appliance's opa.service): only the gateway may
#   ask OPA for decisions, and only for data.mcp.decision; the health check
#   stays open for probes. The gateway's bearer token is compared by SHA-256
#   with data.system.gateway.token_sha256, a list (two entries while a token
#   is rotated) that the deployment loads next to the policies, e.g.
#   `opa run ... policies system.gateway:/etc/opa/gateway-token.json`.
#   Everything else, policy and data writes included, is refused (401).
package system.authz

# METADATA
# title: Allow
# description: Whether OPA serves this API request; missing input refuses.
default allow := false

allow if {
	input.method == "GET"
	input.path == ["health"]
}

allow if {
	input.method == "POST"
	input.path == ["v1", "data", "mcp", "decision"]
	gateway_token(input.identity)
}

# METADATA
# title: Gateway token
# description: True when `identity` is a bearer token whose SHA-256 is listed.
gateway_token(identity) if {
	is_string(identity)
	identity != ""
	some digest in data.system.gateway.token_sha256
	crypto.sha256(identity) == digest
}
