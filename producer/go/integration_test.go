package embedfleet

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	"strconv"
	"testing"
	"time"
)

func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// expectedVectors is the file the Python harness writes from `embedfleet embed`.
type expectedVectors struct {
	Texts   []string    `json:"texts"`
	Vectors [][]float64 `json:"vectors"`
}

func cosine(a []float32, b []float64) float64 {
	var dot, na, nb float64
	for i := range a {
		dot += float64(a[i]) * b[i]
		na += float64(a[i]) * float64(a[i])
		nb += b[i] * b[i]
	}
	return dot / math.Sqrt(na*nb)
}

// TestIntegrationEmbed needs a running fleet; tests/producer/test_fleet_clients.py runs it.
func TestIntegrationEmbed(t *testing.T) {
	if os.Getenv("EMBEDFLEET_KAFKA_BOOTSTRAP") == "" {
		t.Skip("EMBEDFLEET_KAFKA_BOOTSTRAP is not set: no fleet to test against")
	}
	path := os.Getenv("EMBEDFLEET_EXPECTED_VECTORS")
	if path == "" {
		t.Skip("EMBEDFLEET_EXPECTED_VECTORS is not set: no reference vectors")
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var expected expectedVectors
	if err := json.Unmarshal(raw, &expected); err != nil || len(expected.Texts) != len(expected.Vectors) {
		t.Fatalf("bad expected vectors file: %v", err)
	}
	// INT8 vectors depend on the batch they were computed in; see the Python test.
	minCosine := 0.97
	if v, err := strconv.ParseFloat(os.Getenv("EMBEDFLEET_MIN_COSINE"), 64); err == nil {
		minCosine = v
	}

	ctx, cancel := contextWithTimeout(3 * time.Minute)
	defer cancel()
	client, err := NewClient(ctx, ConfigFromEnv())
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := client.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	}()

	vectors, err := client.Embed(ctx, expected.Texts, EmbedOptions{Timeout: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if got := client.Stats().Produced; got != int64(len(expected.Texts)) {
		t.Errorf("first call produced %d requests, want %d (one per distinct text)", got, len(expected.Texts))
	}
	worst, sum := 1.0, 0.0
	for i, vector := range vectors {
		c := cosine(vector, expected.Vectors[i])
		worst, sum = math.Min(worst, c), sum+c
	}
	t.Logf("cosine to `embedfleet embed`: min %.5f mean %.5f over %d texts", worst, sum/float64(len(vectors)), len(vectors))
	if worst < minCosine || sum/float64(len(vectors)) < 0.99 {
		t.Errorf("cosine min %.5f (want >= %.4f), mean %.5f", worst, minCosine, sum/float64(len(vectors)))
	}

	produced := client.Stats().Produced
	again, err := client.Embed(ctx, expected.Texts, EmbedOptions{Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if client.Stats().Produced != produced {
		t.Errorf("the second call produced %d requests; the cache should serve it", client.Stats().Produced-produced)
	}
	for i := range again {
		for j := range again[i] {
			if again[i][j] != vectors[i][j] {
				t.Fatalf("text %d: the cached vector differs from the computed one", i)
			}
		}
	}

	texts := []string{"a good text for the Go client " + strconv.FormatInt(time.Now().UnixNano(), 10), "", "another good one"}
	mixed, err := client.Embed(ctx, texts, EmbedOptions{Timeout: time.Minute})
	var batch *BatchError
	if !errors.As(err, &batch) {
		t.Fatalf("want a *BatchError, got %v", err)
	}
	if len(batch.Failures) != 1 || batch.Failures[0].Index != 1 || batch.Failures[0].Code != "empty_text" {
		t.Errorf("failures %+v", batch.Failures)
	}
	if mixed[0] == nil || mixed[1] != nil || mixed[2] == nil {
		t.Errorf("only text 1 should lack a vector")
	}
}
