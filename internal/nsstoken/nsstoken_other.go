//go:build !cgo

package nsstoken

import (
	"errors"
	"fmt"
)

// ErrNotInstalled is returned when libsoftokn3.so cannot be found, and
// always in a build without cgo, which cannot load PKCS#11 modules.
var ErrNotInstalled = errors.New("nsstoken: NSS softokn is not available")

// TokenLabel is the label of the token that holds the database's keys.
const TokenLabel = "NSS Certificate DB"

// A DB is an NSS key database with its user PIN set.
type DB struct {
	Dir, Module, InitParams, PIN string
}

// Module fails: this build has no cgo.
func Module() (string, error) {
	return "", fmt.Errorf("%w: built without cgo", ErrNotInstalled)
}

// New fails: this build has no cgo.
func New(dir, pin string) (*DB, error) {
	_, err := Module()
	return nil, err
}
