package monitor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// FetchStatus asks the program serving Handler on the Unix socket path for
// its Status, as `noisetor status` does.
func FetchStatus(ctx context.Context, path string) (*Status, error) {
	b, err := get(ctx, path, "/status")
	if err != nil {
		return nil, err
	}
	st := new(Status)
	if err := json.Unmarshal(b, st); err != nil {
		return nil, fmt.Errorf("noisetor: status socket %s: %w", path, err)
	}
	return st, nil
}

// FetchMetrics returns the Prometheus text exposition served on the Unix
// socket path, for a collector that reads files (such as node_exporter's
// textfile collector) or a local proxy.
func FetchMetrics(ctx context.Context, path string) ([]byte, error) {
	return get(ctx, path, "/metrics")
}

// maxResponse bounds what a status socket may send back.
const maxResponse = 16 << 20

func get(ctx context.Context, path, what string) ([]byte, error) {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://noisetor"+what, nil)
	if err != nil {
		return nil, fmt.Errorf("noisetor: %w", err)
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, fmt.Errorf("noisetor: status socket %s: %w", path, unwrapURL(err))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return nil, fmt.Errorf("noisetor: status socket %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("noisetor: status socket %s: GET %s: %s: %s", path, what, resp.Status, strings.TrimSpace(string(b)))
	}
	return b, nil
}

// unwrapURL drops the *url.Error around a dial error: the made-up URL
// means nothing to an operator.
func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
