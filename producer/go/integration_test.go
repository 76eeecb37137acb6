package embedfleet

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	"strconv"
	"strings"
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

// TestIntegrationLongInputs needs a running fleet of workers that speak long inputs (issue 24):
// a text of about 2,000 words, pooled (several windows, a unit vector; never served from the
// cache by the client) and in chunks (spans in order, covering the text).
func TestIntegrationLongInputs(t *testing.T) {
	if os.Getenv("EMBEDFLEET_KAFKA_BOOTSTRAP") == "" {
		t.Skip("EMBEDFLEET_KAFKA_BOOTSTRAP is not set: no fleet to test against")
	}
	paragraph := "The fleet reads requests from Kafka, embeds each text with the model, and writes " +
		"the vectors back to the requester's topic; the cache in Redis answers repeated texts at once. "
	words := len(strings.Fields(paragraph))
	text := strings.TrimSpace(strings.Repeat(paragraph, (2000+words-1)/words)) +
		" " + strconv.FormatInt(time.Now().UnixNano(), 10) // a text no earlier run has pooled

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

	pooled, err := client.EmbedDetailed(ctx, []string{text}, EmbedOptions{Long: LongPool, Timeout: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	pool := pooled[0]
	if pool.Windows < 2 || pool.Chunks != nil || pool.Tokens <= 0 {
		t.Errorf("pool: %d windows, %d chunks, %d tokens; want >= 2 windows and no chunks",
			pool.Windows, len(pool.Chunks), pool.Tokens)
	}
	if norm := vectorNorm(pool.Vector); len(pool.Vector) == 0 || math.Abs(norm-1) > 1e-3 {
		t.Errorf("pool: a vector of %d values and norm %.6f, want a unit vector", len(pool.Vector), norm)
	}

	// The same text again: the client does not read the cache for it, the workers answer.
	produced := client.Stats().Produced
	again, err := client.EmbedDetailed(ctx, []string{text}, EmbedOptions{Long: LongPool, Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if client.Stats().Produced != produced+1 || again[0].Windows != pool.Windows {
		t.Errorf("a repeated pool request: %d requests produced, %d windows (want 1, %d)",
			client.Stats().Produced-produced, again[0].Windows, pool.Windows)
	}

	chunked, err := client.EmbedDetailed(ctx, []string{text}, EmbedOptions{Long: LongChunks, Timeout: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	chunks := chunked[0].Chunks
	if len(chunks) < 2 || len(chunks) != chunked[0].Windows {
		t.Fatalf("chunks: %d chunks for %d windows, want >= 2 and one per window", len(chunks), chunked[0].Windows)
	}
	runes := len([]rune(text))
	if chunks[0].Start != 0 || chunks[len(chunks)-1].End != runes {
		t.Errorf("chunks span [%d, %d), want [0, %d)", chunks[0].Start, chunks[len(chunks)-1].End, runes)
	}
	for i, chunk := range chunks {
		if chunk.End <= chunk.Start || chunk.Tokens <= 0 || len(chunk.Vector) != len(chunked[0].Vector) {
			t.Errorf("chunk %d: [%d, %d), %d tokens, %d values", i, chunk.Start, chunk.End, chunk.Tokens, len(chunk.Vector))
		}
		if i == 0 {
			continue
		}
		previous := chunks[i-1]
		if chunk.Start <= previous.Start {
			t.Errorf("chunk %d starts at %d, not after chunk %d's start %d", i, chunk.Start, i-1, previous.Start)
		}
		if gap := (Chunk{Start: previous.End, End: chunk.Start}).Of(text); chunk.Start > previous.End && strings.TrimSpace(gap) != "" {
			t.Errorf("chunks %d and %d leave %q of the text out", i-1, i, gap)
		}
	}
	// The same windows (cached by the pool call): the same mean, up to INT8's batch effects.
	if c := cosine(chunked[0].Vector, float64s(pool.Vector)); c < 0.98 {
		t.Errorf("the chunks' pooled vector differs from pool's (cosine %.6f)", c)
	}
}

func vectorNorm(v []float32) float64 {
	var sum float64
	for _, x := range v {
		sum += float64(x) * float64(x)
	}
	return math.Sqrt(sum)
}

func float64s(v []float32) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = float64(x)
	}
	return out
}
