//go:build embedtor && !cgo

package libtor

// The embedtor tag links a C library: it needs cgo (CGO_ENABLED=1 and gcc).
// Failing the build here beats silently falling back to a system tor.
var _ = embedtor_build_tag_needs_cgo_set_CGO_ENABLED_1
