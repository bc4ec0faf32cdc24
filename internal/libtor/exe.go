package libtor

import "os"

// Executable names the running executable, for starting it again as a tor
// child (with ChildArg). /proc/self/exe still works when the file has been
// replaced or deleted since this process started (an upgrade), and always
// runs the same code as this process.
func Executable() (string, error) {
	const proc = "/proc/self/exe"
	if _, err := os.Stat(proc); err == nil {
		return proc, nil
	}
	return os.Executable()
}
