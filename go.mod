module github.com/noisetor/noisetor

go 1.26.8

require (
	filippo.io/edwards25519 v1.2.0
	github.com/cretz/bine v0.2.0
	github.com/flynn/noise v1.1.0
	github.com/miekg/pkcs11 v1.1.2
	golang.org/x/net v0.62.0
)

require (
	golang.org/x/crypto v0.58.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
)
